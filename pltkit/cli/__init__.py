"""pltkit.cli"""
