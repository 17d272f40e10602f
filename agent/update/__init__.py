"""Bundle updates on the device: download, stage, health-check, switch, roll back."""
