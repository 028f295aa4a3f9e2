"""What the producer and the workers agree on: settings, job spec, manifests, storage, Celery app."""
