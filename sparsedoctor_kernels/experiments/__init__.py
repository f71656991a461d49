"""What the method's claims are measured with, built on train/: `demo` (the `sparsedoctor demo` run), `ablate`
(seeded ablations of the contrastive objective, `sparsedoctor ablate`) and `domains` (the bundled synthetic and
department multi-domain tasks they train on)."""
