"""The entry points: ``watch`` (a Monitor over training), ``scan`` (a saved model and probe
data) and ``treat`` (trying remedies on a copy). ``import reludoctor`` exposes them."""
