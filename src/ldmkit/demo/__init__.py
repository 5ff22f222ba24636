"""``ldmkit demo --checkpoint DIR``: a web page (Gradio) for a trained pipeline.

The page asks for what the pipeline's conditioner reads (a class, a prompt, a class map, an
image and a mask; a class or a prompt to steer away from), the sampler and its steps, the
guidance scale, the seed and the size;
it shows a progress bar and a preview of the current x0 prediction while sampling, then the
images with the settings that reproduce them through ``ldmkit sample``.

* :mod:`ldmkit.demo.form`: the inputs a pipeline asks for and their checks (no Gradio);
* :mod:`ldmkit.demo.session`: one loaded pipeline sampling for one request at a time;
* :mod:`ldmkit.demo.app`: the Gradio page (imports Gradio, the optional ``demo`` extra:
  ``pip install 'ldmkit[demo]'``);
* :mod:`ldmkit.demo.server`: :func:`ldmkit.demo.server.serve`, the ``ldmkit demo`` process
  (one temporary folder for all it writes, Gradio's files included; PIL's size limit).

Owns the web page. An entry point (layer 6): may import anything in ldmkit.
"""

from ldmkit.demo.form import ConditionField, DemoInputError, PageRequest, condition_fields

__all__ = ["ConditionField", "DemoInputError", "PageRequest", "condition_fields"]
