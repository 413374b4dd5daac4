"""Training: `loop.train` (the loop), `step` (forward/backward, GradCache accumulation), `optim`
(AdamW groups, cosine schedule), `state` (resumable checkpoints), `distributed` (torchrun/DDP),
`cache` (locked image tower feature cache), `evaluate` (val loss, recall@K), `logging` (metrics)."""
