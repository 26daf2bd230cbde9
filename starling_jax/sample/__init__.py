"""Generation for the causal-LM role: the jitted KV-cache sampler (`engine`), the per-step decoding math
(`logits`) and the host-side driver that buckets prompts into a few compiled shapes (`rollout`)."""
