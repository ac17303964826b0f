"""The command line: ``sdserve`` / ``python -m sdserve`` runs the server or a helper command.

    commands.py         the entry point: picks the command (server, generate, tiny-model, train)
    generate.py         ``sdserve generate``: images from a terminal, via a server or locally
    generate_options.py its flags
    local_model.py      ``--model_dir``: the server's model and engine in this process
    stream_client.py    ``--progress`` against a server: the OpenAI route's event stream
    parameter_help.py   ``--show_parameters``: the request schema as a table of flags

May import every other part of sdserve (it is the top layer); nothing imports it.
"""

from .commands import main

__all__ = ["main"]
