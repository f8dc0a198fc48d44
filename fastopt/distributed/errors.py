"""The errors of :mod:`fastopt.distributed`."""


class DistributedError(RuntimeError):
    """Raised on every rank when the ranks disagree (shapes, calls, gradient kinds,
    hyperparameters) or when another rank's input was invalid; nothing was changed."""


class StateDictMismatchError(DistributedError, ValueError):
    """Raised on every rank by :meth:`ShardedOptimizer.load_state_dict` when the ranks
    were given different state dicts (arrays, step counts or hyperparameters): a
    ``ValueError`` as well as a :class:`DistributedError`; nothing was changed."""
