"""State stores: where group records live, changed only by compare-and-swap commits."""

from computegroups.state.base import Changes, RevisionConflict, StateStore
from computegroups.state.memory import MemoryStateStore
from computegroups.state.sqlite import SqliteStateStore, default_state_path

__all__ = ["Changes", "MemoryStateStore", "RevisionConflict", "SqliteStateStore", "StateStore", "default_state_path"]
