"""Write a tiny Hugging Face fixture with transformers: a randomly
initialised model saved with save_pretrained, and what transformers
computes for it in eval mode (expected.safetensors: input_ids, logits and
each MoE layer's router_logits.{i}).

    python scripts/make-hf-fixture.py qwen3moe-bias tests/fixtures/hf-qwen3moe-bias-tiny

Weights are drawn N(0, 0.2) (norm weights 1 + N(0, 0.1)) so that the
logits and the routing depend on every part of the model. Needs torch,
transformers and safetensors; the tests only read what it writes.
"""
import sys

import torch
from safetensors.torch import save_file
import transformers as tf

KINDS = {
    # Qwen3-MoE with attention_bias: biases on q, k, v and o, per-head q/k
    # norms, a dense middle block, head_dim apart from hidden / heads.
    "qwen3moe-bias": lambda: tf.Qwen3MoeForCausalLM(
        tf.Qwen3MoeConfig(
            vocab_size=256, hidden_size=64, head_dim=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, mlp_only_layers=[1], attention_bias=True,
            max_position_embeddings=128, rope_theta=1e6,
        )
    ),
}


def main(kind, out):
    torch.manual_seed(0)
    model = KINDS[kind]().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(out)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        res = model(ids, output_router_logits=True)
    expected = {"input_ids": ids, "logits": res.logits.contiguous()}
    for i, r in enumerate(res.router_logits or ()):
        expected[f"router_logits.{i}"] = r.contiguous()
    save_file(expected, f"{out}/expected.safetensors")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
