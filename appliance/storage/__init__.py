"""Everything that knows the data lives in SQLite. SQL appears nowhere else."""
