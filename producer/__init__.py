"""The producer: validate a job, upload its inputs, enqueue its stages. ``producer.api`` is the library."""
