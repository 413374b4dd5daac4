"""What runs while training and evaluating: shard reading (`tar_reader`), decoding (`decoding`,
`images`), transforms, pairing, the streaming `loader`, and the Pascal VOC reader (`voc`)."""
