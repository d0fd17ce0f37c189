"""The exceptions the CLI turns into one line: mistakes a user can fix, and a training stopped on request."""


class CtfgenError(Exception):
    """Bad input or a missing resource: the message says what is wrong and what to do."""


class TrainingStopped(KeyboardInterrupt):
    """A training stopped by SIGTERM/SIGINT after writing its checkpoint: the message says where and how to go on.
    A KeyboardInterrupt, so that what catches a Ctrl-C catches it, and nothing carries on as if it had finished."""


def check_finished(name: str, step: int, steps: int, how_to_resume: str) -> None:
    """Raise TrainingStopped when a training returned at `step` before its last step `steps`."""
    if step < steps:
        raise TrainingStopped(f"{name} stopped at step {step} of {steps}, checkpointed; {how_to_resume}")
