"""What a person looks at: plots, fonts for the characters, montages and the results table.

Empty on purpose: import from the modules, so that importing one layer never pulls in another."""
