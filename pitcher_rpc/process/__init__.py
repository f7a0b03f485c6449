"""The process model: a master, its workers, the control plane and the admin API."""
