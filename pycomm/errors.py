"""pycomm's exceptions. Every error the engine raises derives from CommError (a RuntimeError)."""

from ._native import _core

#: Base of every communication error. After one (other than bad arguments, which raise
#: TypeError/ValueError before anything is sent) the communicator refuses further calls.
CommError = _core.CommError

#: A peer died, stopped participating, or did not answer within the timeout (PYCOMM_TIMEOUT).
PeerError = _core.PeerError

#: Ranks made different calls (count, dtype or op) at the same point; raised on every rank.
#: Detected by the shared-memory algorithms so far; the ring over MPI does not check yet.
MismatchError = _core.MismatchError

__all__ = ["CommError", "MismatchError", "PeerError"]
