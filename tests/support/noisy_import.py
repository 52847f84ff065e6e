"""A module that prints when it is imported, as some libraries do."""

print("noisy_import: imported")
