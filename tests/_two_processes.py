"""`accelerate launch` as two CPU processes (DDP over gloo), for the tests that check the ranks agree.

The launched script needs `ACCELERATE_USE_CPU=true` in its environment.
"""

import socket
import sys


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for the processes' rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_cpu_processes() -> list[str]:
    """The command prefix that runs a script and its arguments under accelerate as 2 processes."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
    ]  # fmt: skip
