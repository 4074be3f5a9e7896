"""edgefleet's fleet controller: publish bundles and roll them out to devices over MQTT."""
