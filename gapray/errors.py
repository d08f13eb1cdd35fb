"""User errors: bad config, bad prompt file, missing model. The CLI prints them as one line, exit code 2."""


class UserError(Exception):
    """An error in what the user gave us, with a message that says what is wrong and how to fix it."""
