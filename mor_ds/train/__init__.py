"""DeepSpeed training: `mor_ds.train.run.train` assembles a run, `mor_ds.train.loop.Trainer` runs it."""
