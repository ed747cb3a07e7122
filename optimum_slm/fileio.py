"""Moved to ``optimum_slm.io.output``; these names stay importable from here for code not yet switched."""

from .io.output import AtomicDir, check_output_dir, claim_output, follow_umask, pid_alive

__all__ = ["AtomicDir", "check_output_dir", "claim_output", "follow_umask", "pid_alive"]
