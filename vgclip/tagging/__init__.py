"""`vgclip predict` over a whole collection: inputs listed into parts, decoded by DataLoader workers, scored,
written in resumable parts (predictions, clip-retrieval embeddings, skips), merged at the end; re-tagging
stored embeddings for a new label set (docs/design.md, `tagging/`)."""
