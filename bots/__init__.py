"""Chat adapters: they turn platform events into tasks and render run events back."""
