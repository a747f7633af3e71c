"""The project's command-line tools: ``python scripts/<tool>.py ...`` or, installed, ``ctc-crnn <tool> ...``
(see :mod:`scripts.cli`). Each tool module has a ``main(argv=None)``."""
