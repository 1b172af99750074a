"""Command-line errors as one line: argparse prints its whole usage block before the message (70 lines for the
training options), which buries the one line that says what is wrong."""

from typing import NoReturn


class OneLineErrors:
    """Mixin for an `argparse.ArgumentParser` subclass: `prog: error: message; see --help for the options.`, exit 2."""

    def error(self, message: str) -> NoReturn:
        if "--help" not in message:
            message = message.rstrip(".") + "; see --help for the options."
        self.exit(2, f"{self.prog}: error: {message}\n")
