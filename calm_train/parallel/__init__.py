"""Device/backend choice, megatron parallel_state, DeepSpeed engines, pipeline stages, CPU shims."""
