"""The data layer: where rows come from (``sources``), what they hold and how they render (``formats``),
tokens (``tokens``, ``sft``), the typed batches that cross actor boundaries (``batches``) and function
rewards (``rewards``)."""
