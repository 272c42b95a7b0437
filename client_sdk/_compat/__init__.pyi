# Type checkers see the deprecated alias as what it is at run time: tessera_mq.client.
from tessera_mq.client import *  # noqa: F403
from tessera_mq.client import __all__ as __all__
