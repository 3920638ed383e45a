"""``python -m nvib`` (and ``accelerate launch -m nvib``, ``torchrun -m nvib``): the ``nvib`` command line."""

from nvib.cli import app

if __name__ == "__main__":
    app(prog_name="nvib")
