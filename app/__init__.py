"""Campaign scheduler: the library the API imports (no worker-only code here)."""
