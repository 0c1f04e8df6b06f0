"""The run machinery: engine, Runs and their jobs, queue, reconciler, schedules, batches."""
