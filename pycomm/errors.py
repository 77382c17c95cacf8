"""pycomm's exceptions. Every error the engine raises derives from CommError (a RuntimeError)."""

from ._native import _core

#: Base of every communication error. After one (other than bad arguments, which raise
#: TypeError/ValueError before anything is sent) the communicator refuses further calls.
CommError = _core.CommError

#: A peer died (seen within ~0.1 s on this node) or did not answer within the timeout
#: (PYCOMM_TIMEOUT). After one, the process ends with MPI_Abort at exit: MPI_Finalize would hang.
PeerError = _core.PeerError

#: Ranks made different calls (kind, count, dtype, op, root) at the same point; raised on every
#: rank before any data moves, naming two ranks and their calls.
MismatchError = _core.MismatchError

__all__ = ["CommError", "MismatchError", "PeerError"]
