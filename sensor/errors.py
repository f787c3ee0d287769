"""botwall's exception tree; every error the sensor raises is one of these.

    BotwallError
    ├── SensorError            the kernel side
    │   ├── CompileError       BCC could not compile bpf/, or the verifier refused it
    │   ├── AttachError        an interface: missing, busy, wrong mode
    │   └── MapError           a kernel map could not be read or written
    ├── ConfigError            settings that cannot work
    ├── PolicyError            a policy that cannot be applied
    └── StoreError             the durable store (controlplane/store.py)

BCC raises bare Exception: the sensor catches it at its boundary and re-raises
one of these with the interface and the program named.
"""


class BotwallError(Exception):
    """Root of every error botwall raises on purpose."""


class SensorError(BotwallError):
    pass


class CompileError(SensorError):
    pass


class AttachError(SensorError):
    pass


class MapError(SensorError):
    pass


class ConfigError(BotwallError):
    pass


class PolicyError(BotwallError):
    pass
