"""The command lines: ``common`` holds what they share (the device flag, the analysis commands' corpus
flags, help texts that give every default, exit codes); ``train`` builds ``python -m trainer.run``'s
flags from ``TrainConfig``. The commands themselves are ``trainer.run``, ``trainer.analyze`` and
``trainer.evaluate``.
"""
