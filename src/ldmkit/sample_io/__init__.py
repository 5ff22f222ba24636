"""What the two front ends of sampling, ``ldmkit sample`` (:mod:`ldmkit.cli`) and
``ldmkit demo`` (:mod:`ldmkit.demo`), both read and write: condition inputs by kind
(:mod:`~ldmkit.sample_io.conditions`) and the grid, PNGs and settings JSON of a result
(:mod:`~ldmkit.sample_io.samples`). Both import this package; it imports neither of them."""
