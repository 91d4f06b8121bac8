# Lets `pytest` run from the repository root without installing the package.
