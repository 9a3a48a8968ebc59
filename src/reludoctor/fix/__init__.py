"""Changing the model: undoable remedies, reviving dead units, and reviving them live while a
run trains."""
