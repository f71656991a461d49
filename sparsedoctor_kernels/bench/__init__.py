"""The benchmark suite: one module per op (`route`, `lora_moe`, `queue`, `infonce`) and the end-to-end training
step (`step`), sharing `harness` (timing, memory, CSV); `suite` (`sparsedoctor bench`: all of them, one CSV) and
`plots`; `layer_launches` (kernel launches per module and per decoder layer). The scripts in the repository's
benchmarks/ folder are thin wrappers."""
