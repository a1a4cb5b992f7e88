"""pltkit.runtime"""
