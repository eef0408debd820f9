"""The jobs of the command line, one room each: options.py (`QuantizeOptions` and every check
made before loading), run_data.py (the run's data, chosen once), quantize.py (the quantize job as
named stages), evaluate.py and inspect.py. `qlin_cli.api` is their public import path; they import
the library modules, and no library module imports them.
"""

__all__: list[str] = []
