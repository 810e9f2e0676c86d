"""AutoCode's agent: plan -> execute -> evaluate -> repair."""
