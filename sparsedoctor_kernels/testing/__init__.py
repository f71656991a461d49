"""What the ops are checked and compared against: `check` (every op on every backend against the float64 torch
reference, the `sparsedoctor check` command), `baselines` (the LoRA-MoE, routing, queue and InfoNCE code people
write today) and `tolerances` (per-dtype comparison tolerances). Imports the library only."""
