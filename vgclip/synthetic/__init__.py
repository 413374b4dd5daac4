"""Built-in synthetic data for the demo and tests: procedurally drawn scenes (`draw`), their
region phrases (`text`), and writers of a Visual Genome folder and a VOC2007 folder (`writers`)."""
