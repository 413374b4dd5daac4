"""Prepare-time work (`vgclip prepare`): Visual Genome / COCO / CSV readers (`visual_genome`,
`sources`), cleaning and the train/val split (`cleaning`), shard writing (`shards`) and the
resumable pipeline that ties them together (`pipeline`)."""
