"""The bundled demo zoo: small models trained on scikit-learn's digits (``python -m jobs.demo build DEST``).

``jobs.demo.models`` holds the model classes (the zoo's factories), ``jobs.demo.build`` trains them
and writes the zoo folder. Must not import ray or click; importing this package imports nothing
heavy (torch and scikit-learn load with the submodules).
"""
