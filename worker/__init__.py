"""modelyard workers: the Celery app, thin stage tasks, and the stage plugins."""
