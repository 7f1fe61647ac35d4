//! The trainer's checkpoints: when one is due, gathering what every rank
//! holds (cursors, and under expert parallelism the experts' weights and
//! moments), the check that the ranks still agree, and the atomic save.

use super::{parallel, Trainer};
use crate::checkpoint::{self, Checkpoint, SaveOptions};
use anyhow::Result;

impl Trainer<'_> {
    /// Every `checkpoint_every` steps, at the last step and at a
    /// `--stop-after` boundary.
    pub(super) fn checkpoint_due(&self) -> bool {
        let (step, every) = (self.state.step, self.cfg.train.checkpoint_every);
        step == self.cfg.train.steps || step == self.stop_at || (every > 0 && step % every == 0)
    }

    pub(super) fn save_checkpoint(&mut self) -> Result<()> {
        let cursor = self.train_stream.cursor();
        let cursors = if self.world.size > 1 {
            self.check_ranks_in_step()?;
            parallel::gather_cursors(&mut *self.comm, &cursor)?
        } else {
            Some(vec![cursor])
        };
        // The weights and moments on the host: rank 0's to write, and under
        // expert parallelism every rank's slice of the experts to gather.
        if !self.world.is_writer() && self.ep.is_none() {
            return Ok(());
        }
        let mut model = crate::params::collect(self.model());
        let mut optimizer = checkpoint::encode_optimizer(&self.adam.m, &self.adam.v);
        if let Some(ep) = &self.ep {
            parallel::gather_experts(&mut model, ep);
            parallel::gather_experts(&mut optimizer, ep);
        }
        let Some(mut cursors) = cursors else {
            return Ok(());
        };
        self.state.cursor = cursors.remove(0);
        self.state.rank_cursors = match self.cfg.data.sharding {
            // Every rank reads the same stream: one cursor serves all.
            crate::config::Sharding::Rows => Vec::new(),
            crate::config::Sharding::Documents => cursors,
        };
        if let Some(s) = &mut self.sinks {
            s.jsonl.flush()?;
            s.tb.flush()?;
        }
        let ckpt = Checkpoint {
            model,
            optimizer,
            state: self.state.clone(),
            config: self.cfg.clone(),
            tokenizer: Some(self.tok_path.clone()),
        };
        let opts = SaveOptions {
            keep: self.cfg.train.keep_checkpoints,
            fail_after_files: None,
        };
        checkpoint::save(&self.run_dir, &ckpt, &opts)?;
        Ok(())
    }

    /// Stop with an error unless the ranks hold what they should (see
    /// [`parallel::check_ranks_agree`]); rank 0 logs the checksums.
    fn check_ranks_in_step(&mut self) -> Result<()> {
        let slots = self.ep.as_ref().map_or(1, |e| e.degree);
        let model = self
            .model
            .as_ref()
            .expect("the model is back after each update");
        let sums = parallel::check_ranks_agree(model, &mut *self.comm, slots, self.state.step)?;
        if let Some(s) = &mut self.sinks {
            s.jsonl.write(&serde_json::json!({
                "step": self.state.step,
                "param_checksums": sums.iter().map(|c| c[0]).collect::<Vec<_>>(),
                "expert_checksums": sums.iter().map(|c| c[1]).collect::<Vec<_>>(),
            }))?;
        }
        Ok(())
    }
}
