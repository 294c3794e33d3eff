"""Few-shot evaluation through lm-eval: the model adapter (`adapter.MoRLM`) and the harness driver (`harness`)."""
