"""Stage logic as plain functions (no Celery here): convert, optimize (variant + select), deploy."""
