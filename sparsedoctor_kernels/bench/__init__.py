"""The benchmark suite: one module per op (`route`, `lora_moe`, `queue`, `infonce`) and the end-to-end
training step (`step`), sharing `harness` (timing, memory, CSV). `sparsedoctor bench` runs them; the scripts in
the repository's benchmarks/ folder are thin wrappers."""
